"""Understanding CNNs: receptive fields, attribution, visualisation, equivariance and position-information probes."""
