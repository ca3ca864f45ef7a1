"""vlrl: teach vision-language models to reason with reinforcement learning."""

__version__ = "0.1.0"
