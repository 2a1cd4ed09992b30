"""The core layer: what every feature shares and nothing feature-specific.

Config base and registry, progress/stop and the job contract, safe file I/O, model families,
loading and key maps, LoRA file formats and block maps, captions, images, video, the CLIP
tokenizer, precision names, device choice and sampling. Imports only point down: the core never
imports a feature (training, grid, merge, dataset_tools, facetrain) or the app (cli, ui).
"""
