"""Models: the registry of named models and how each kind of weights file loads."""
