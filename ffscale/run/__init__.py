"""One job from launcher to last step: the launch and its preflight, the run lock, config changes,
the pipeline of stages, one stage's loop and what it records. Sees the engine, the loaders and the
tracker through their small interfaces."""
