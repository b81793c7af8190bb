"""CALDERA: W ≈ Q + L·R fitted against calibration Hessians."""
