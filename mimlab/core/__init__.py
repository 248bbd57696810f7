"""Layer 0, configuration: errors, the method registry, typed configs, the papers' optimiser
settings, statistics and the distributed helpers. Nothing here imports torch at module level
except :mod:`.dist`; the CLI reads and checks a config before torch is imported."""
