"""Simulation-driven planning: the step model, the cost model the passes consult, the layout search, calibration
against this machine, the measured set, and the emulated cluster's scaling to a target's balance."""
