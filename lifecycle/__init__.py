"""The model lifecycle around the serving path: monitoring (drift signals, windows, feedback,
canary accuracy, the retrain trigger). It subscribes to the engine's observer hooks and never
imports the service."""
