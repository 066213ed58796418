"""Deterministic views: parameters are a pure function of (recipe, global seed, augmentation seed, sample)."""

from kdcache.augment.recipe import ViewRecipe
from kdcache.augment.params import view_params, NUM_PARAMS

__all__ = ["ViewRecipe", "view_params", "NUM_PARAMS"]
