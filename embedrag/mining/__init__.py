"""Data made with a model: mined hard negatives and teacher scores."""
