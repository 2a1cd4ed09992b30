"""`loratrain train`'s options in groups (model, data, network, optimizer and schedule, noise and loss, saving,
sampling), each declared with its own checks. TrainConfig (training/config.py) is all of them at once, so the
command line, TOML files and the app keep sd-scripts' flat names; the rules that tie two groups together live there.
"""

MODEL, DATA, NET, OPTIM, NOISE, SAVE, SAMPLE, LOGS = ("Model", "Dataset", "Network", "Optimizer and schedule", "Noise and loss",
                                                    "Saving and resume", "Sampling", "Logs")
