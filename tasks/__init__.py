"""tlflow stages: one module per stage (a pure core and a thin `run` shell), plus shared pieces."""
