"""selfflow.text: text encoders and caption conditioning shared by the modalities, plus the latent-shard
format every prepared dataset uses."""
