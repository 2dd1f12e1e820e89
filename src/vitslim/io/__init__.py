"""Reading and writing: models and their saved folders (safetensors plus a recipe), the
recipe's replayable steps, training checkpoints, and the user's images."""
