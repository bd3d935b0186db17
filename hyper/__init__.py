"""hyper: the diffusion hypernetwork (DiT), its diffusion maths, trainer and sampler."""
