from .compile_hook import CompileHook
from .loops import (EmptyDatasetError, NonEmptyIterBasedTrainLoop, NonEmptyTestLoop,
                    NonEmptyValLoop)
from .rng_state_hook import RNGStateHook

__all__ = ['CompileHook', 'EmptyDatasetError', 'NonEmptyIterBasedTrainLoop',
           'NonEmptyTestLoop', 'NonEmptyValLoop', 'RNGStateHook']
