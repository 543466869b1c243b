"""ECG arrhythmia task: raw single-lead ECG to a rhythm label every 256 samples (Hannun et al. 2019)."""
