"""`RecipeError`, the one error type of a user mistake in the recipes, in a module of its own so that
every training module (arguments, data, checkpoints, models, loop) can raise it without importing another."""


class RecipeError(ValueError):
    """A user mistake found before training: the message names the flag or file and the fix."""
