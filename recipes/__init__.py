"""Training recipes people run (medical/UniMed, diffusion/IterComp, alignment/Baichuan family).

Each recipe is job specs plus components, data and losses. May import planner specs, the runtime
component registry, torch, transformers and diffusers. Planning-level specs live in examples/;
trainable recipes arrive with their issues.
"""
