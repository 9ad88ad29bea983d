from .compile_hook import CompileEvalHook
from .loops import (EmptyDatasetError, NonEmptyIterBasedTrainLoop, NonEmptyTestLoop,
                    NonEmptyValLoop)
from .rng_state_hook import RNGStateHook

__all__ = ['CompileEvalHook', 'EmptyDatasetError', 'NonEmptyIterBasedTrainLoop',
           'NonEmptyTestLoop', 'NonEmptyValLoop', 'RNGStateHook']
