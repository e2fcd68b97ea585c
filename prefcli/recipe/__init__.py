"""Recipes: pydantic schemas, YAML loading, `--set` overrides and actionable errors; the command table."""

from .commands import COMMANDS, SCHEMAS, RecipeBase
from .loader import LoadedRecipe, dump_recipe, load_recipe

__all__ = ["COMMANDS", "SCHEMAS", "RecipeBase", "LoadedRecipe", "dump_recipe", "load_recipe"]
