"""Launchers into Ray: Ray Train workers that run a command's recipe (ray_train.py, with Ray Data
tokenizing into token stores) and a pool of Ray tasks for independent runs (ray_tasks.py). The shell
launchers (deepspeed, torchrun, Slurm, `ray job submit`) are in the repository's launchers/ folder."""
