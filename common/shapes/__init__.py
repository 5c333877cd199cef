"""Shapes testbed: procedural scenes, a tiny pretrained text-to-image model, and a programmatic reward.

See docs/shapes.md. Submodules: scenes (generator and caption grammar), detect (object detector),
prompt_sets, diversity, train_base (trains the shipped model in common/assets/shapes_base/).
"""
