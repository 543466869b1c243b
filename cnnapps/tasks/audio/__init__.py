"""Audio task: sound classification (FSDD spoken digits, any <class>/*.wav folder) from log-mel images or waveforms."""
