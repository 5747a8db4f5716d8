"""Config plumbing in plain Python: where the Hydra configs come from (``dirs``), checked config sections
(``checks``) and the ``${surgenet.*}`` resolvers (``resolvers``). The YAML configs themselves are in
``surgenet_ssl/configs/``."""
