from .loops import (EmptyDatasetError, NonEmptyIterBasedTrainLoop, NonEmptyTestLoop,
                    NonEmptyValLoop)
from .rng_state_hook import RNGStateHook

__all__ = ['EmptyDatasetError', 'NonEmptyIterBasedTrainLoop', 'NonEmptyTestLoop', 'NonEmptyValLoop',
           'RNGStateHook']
