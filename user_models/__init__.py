"""Architectures of your own. Put a module here (``user_models/net.py``) with a callable that
takes ``num_classes``, ``in_channels`` and your keyword arguments and returns an ``nn.Module``,
then name it in params.yaml as ``arch: user_models.net:build`` (``arch_config`` holds the keyword
arguments). dvc.yaml lists this folder as a dependency of every stage that builds a model, so
editing a file here re-runs them. See ``example.py`` and docs/stages.md, "Your own weights and
architectures"."""
