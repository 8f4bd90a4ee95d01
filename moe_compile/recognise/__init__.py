"""What an MoE block computes, recognised from its parameters and proven from its behaviour (no FX here).

- ``experts``: an experts module's readings from its parameter shapes, and the float64 proof on random parameters;
- ``structure``: what an MoE block is from its parameters alone (a router ``[E, H]`` beside E experts);
- ``readings``: a whole block's readings (router, experts, shared children, buffers) and their fused form;
- ``block_proof``: a block's reading from its behaviour, proven forward and backward.
"""
