"""Deterministic views: parameters are a pure function of (recipe, global seed, augmentation seed, sample)."""

from kdcache.augment.recipe import ViewRecipe
from kdcache.augment.params import ParamLayout, view_params

__all__ = ["ViewRecipe", "ParamLayout", "view_params"]
