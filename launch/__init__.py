"""How a job starts: cluster profiles, Accelerate / DeepSpeed / FSDP settings, local launch,
SLURM scripts. Nothing here knows about losses; nothing in `trainer/` knows about SLURM."""
