"""DVC stage entry points: ``python -m stages.<name>``. Each reads its params section, calls
``pipeline/``, writes its outputs atomically and exits non-zero when its contract fails."""
