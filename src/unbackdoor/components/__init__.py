"""Building blocks that removal methods share, each usable on its own: no recipe, no config object.

- :mod:`.perturb`: a learnable perturbation δ of one decoder layer's hidden states, added by a forward hook
  inside a context manager (BEEAR's entrapment; any latent-space adversary).
- :mod:`.parrot`: a soft prompt spliced into the input embeddings at a fixed place of the chat rendering
  (SANDE's parrot; any learned trigger stand-in), with its collator, saving and loading.

Methods (:mod:`unbackdoor.methods`) import from here; nothing here imports a method.
"""
