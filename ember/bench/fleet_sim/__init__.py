"""`ember bench fleet-sim`: a fleet of simulated workers in virtual time, routed by ember's real
router code, with service times calibrated from ember's real engine."""
