"""``moe-compile demo`` (also ``python -m moe_compile demo``): train a small byte-level MoE transformer on the
shipped Shakespeare corpus with ``moe_compile.parallelize`` + DDP + ``torch.compile(backend="moe")`` on a few local
processes, and compare it with plain DDP. Modules: ``model`` (the transformer), ``data`` (corpus, batches),
``train`` (one rank), ``check`` (one step against one process), ``plot``, ``cli``. Needs the ``demo`` extra
(tqdm, matplotlib)."""
