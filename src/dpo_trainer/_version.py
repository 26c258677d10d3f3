"""The package's version, in a module of its own: the model card reads it without importing the package
(whose `__init__` imports the trainer, which imports the model card), and setup.cfg reads it statically."""

__version__ = "0.1.0"
