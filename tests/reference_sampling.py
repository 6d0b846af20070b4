"""Uncached reference samplers: every step recomputes the whole prefix, written the way the official
samplers read (the loops the library had before its samplers became decoding plans). The one sampler
(quantcore.fastgen) must give their tokens: that checks its KV caches, buffers and step bookkeeping."""

from __future__ import annotations

import torch

from quantcore.fastgen import sampling_settings
from quantcore.models.common import draw, filter_logits
from quantcore.models.rar import cfg_schedule
from quantcore.models.var import filter_logits as var_filter_logits


@torch.no_grad()
def reference_tokens(model, classes: torch.Tensor, seeds: list[int], **sampling) -> torch.Tensor:
    settings = sampling_settings(model.family, sampling)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return {"llamagen": _llamagen, "rar": _rar, "var": _var}[model.family](
        model, classes, generators, **settings
    )


def _cond_rows(model, classes, guided):
    return torch.cat([classes, torch.full_like(classes, model.null_class)]) if guided else classes


def _llamagen(model, classes, generators, cfg_scale, temperature, top_k, top_p, cfg_interval):
    cfg, device = model.config, classes.device
    guided = cfg_scale > 1.0
    cond = _cond_rows(model, classes, guided)
    tokens = torch.zeros(classes.shape[0], cfg.num_tokens, dtype=torch.long, device=device)
    slots, r = model.token_slots, cfg.par_regions
    produced = 0
    counter = 0  # the official samplers' loop index: per decode phase, in tokens
    while produced < cfg.num_tokens:
        if produced == 0:
            pos = torch.tensor([0])
        elif r and produced == r:
            pos = torch.arange(int(slots[r - 1]), int(slots[r]))
        else:
            width = r if r and produced > r else 1
            pos = slots[produced - width : produced].cpu()
        n_new = pos.numel()
        full = model.embed_sequence(cond, torch.cat([tokens, tokens]) if guided else tokens)
        upto = int(pos.max()) + 1
        logits = model(full[:, :upto], torch.arange(upto, device=device))[:, pos.to(device)][:, -n_new:]
        if guided:
            c, u = logits.chunk(2)
            # official LlamaGen and PAR: the prefill is always guided; each decode loop (PAR: the AR
            # tokens, then the parallel groups) counts i from 0 and guides while i <= cfg_interval
            on = cfg_interval < 0 or produced == 0 or counter <= cfg_interval
            logits = u + (c - u) * cfg_scale if on else c
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        tokens[:, produced : produced + n_new] = draw(probs, generators).to(device)
        if produced > 0:
            counter += n_new  # AR: 1 per token; PAR's parallel loop: r per step
        produced += n_new
        if r and produced == r:
            counter = 0  # the parallel phase is a new loop
    return tokens


def _rar(model, classes, generators, cfg_scale, cfg_pow, temperature, top_k, top_p):
    cfg, device = model.config, classes.device
    guided = cfg_scale != 0
    cond = _cond_rows(model, classes, guided)
    tokens = torch.zeros(classes.shape[0], cfg.num_tokens, dtype=torch.long, device=device)
    for step in range(cfg.num_tokens):
        rows = torch.cat([tokens, tokens]) if guided else tokens
        pos = torch.arange(2 + step, device=device)
        x, c = model.embed(cond, rows[:, :step], pos)
        logits = model(x, c, pos, use_cache=False)[:, -1:]
        if guided:
            cond_logits, uncond_logits = logits.chunk(2)
            scale = cfg_schedule(step, cfg.num_tokens, cfg_scale, cfg_pow)
            logits = uncond_logits + (cond_logits - uncond_logits) * scale
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        tokens[:, step] = draw(probs, generators)[:, 0].to(device)
    return tokens


def _var(model, classes, generators, cfg_scale, top_k, top_p, more_smooth, temperature):
    cfg, device = model.config, classes.device
    b = classes.shape[0]
    guided = cfg_scale != 0
    rows = _cond_rows(model, classes, guided)
    cond = model.class_emb(rows)
    tokens = torch.zeros(b, cfg.num_tokens, dtype=torch.long, device=device)
    last = cfg.num_scales - 1
    for si, (start, end) in enumerate(cfg.scale_bounds):
        prefix = tokens[:, :start]
        full, _ = model.embed_sequence(rows, torch.cat([prefix, prefix]) if guided else prefix)
        logits = model(full, cond, torch.arange(end, device=device))[:, start:end]
        if guided:
            t = cfg_scale * si / last
            logits = (1 + t) * logits[:b] - t * logits[b:]
        probs = var_filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        tokens[:, start:end] = draw(probs, generators).to(device)
    return tokens
