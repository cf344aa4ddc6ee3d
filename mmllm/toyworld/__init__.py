"""The embedded default ("toy world"): a procedural multimodal world and its small pretrained parts.

* :mod:`~mmllm.toyworld.world`    attributes, captions, held-out combinations, a seeded sampler;
* :mod:`~mmllm.toyworld.render`   image, sound and video renderers;
* :mod:`~mmllm.toyworld.text`     the frozen real text encoder (all-MiniLM-L6-v2);
* :mod:`~mmllm.toyworld.parts`    architectures of the frozen parts and how they are saved/loaded;
* :mod:`~mmllm.toyworld.vocoder`  a Griffin-Lim vocoder with AudioLDM's vocoder contract;
* :mod:`~mmllm.toyworld.judges`   one classifier per modality that reads attributes back from media;
* :mod:`~mmllm.toyworld.training` the resumable training loop;
* :mod:`~mmllm.toyworld.recipes`  how judges and encoders are trained, and the list of parts;
* :mod:`~mmllm.toyworld.diffusion` how the VAEs and diffusion decoders are trained and exported;
* :mod:`~mmllm.toyworld.evaluate` judge, retrieval and oracle-decoder accuracy;
* :mod:`~mmllm.toyworld.report`   ``mmllm world report``: those, seen vs held-out, and a contact sheet.
* :mod:`~mmllm.toyworld.identity` whether an assembly's encoders and decoders are the toy world's parts.
"""
