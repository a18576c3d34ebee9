"""slimdeploy library: the functions the DVC stages (``stages/``) call. Library code reads no
params.yaml, parses no arguments and chooses no file paths on its own.

Four modules also have a small command-line front end (``main``), kept here because users and the
handoff bundle call them by these names: ``pipeline.predict`` (run a bundle on images),
``pipeline.preset`` (params presets), ``pipeline.report`` (what ``make run`` prints at the end) and
``pipeline.runtimes.aoti_check`` (the torch engine's out-of-process load check). Only their
``main`` parses arguments; what it calls takes plain values like the rest of the library."""

__version__ = "0.1.0"
