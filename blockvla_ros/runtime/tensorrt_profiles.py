"""TensorRT optimization profiles for the backbone graph's token count n (pure Python: checked on CPU in tests).

One TensorRT engine per graph; the backbone's engine carries one profile per pass shape the decoders use, each an
exact shape (min = opt = max, so its kernels are tuned for it), plus one range profile that catches every other n
(real-time chunking carries whole known blocks into a pass: n = k*B + B):

    n = 1        AR                                    n = L        full diffusion
    n = B        refine (each trained block size)      n = P        one-call prefill
    n = 2B       fused commit + refine                 n = Lt, P-Lt split prefill (instruction, observation)
    n = P+B, P-Lt+B, P+L, P-Lt+L                       the prefill (or its observation part) folded into the
                                                       first refine / full-diffusion pass (runtime.decoding)
    [1, T_max]   anything else (opt 2B)

A context is created per profile (they share one scratch buffer: only one runs at a time), so a pass never switches
profiles; `pick_profile` chooses the exact profile for n, else the range profile. The cache inputs' 'past' dim is
T_max in every profile: TensorRT passes read the whole cache (static shapes, one CUDA graph per n).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..model.prefix_layout import layout_for


@dataclass(frozen=True)
class Profile:
    min: int
    opt: int
    max: int

    @property
    def exact(self) -> bool:
        return self.min == self.max

    def covers(self, n: int) -> bool:
        return self.min <= n <= self.max


def token_counts(config) -> dict:
    """{n: what uses it} for the passes the decoders make on `config` (known-action carries aside)."""
    layout = layout_for(config)
    L, P, Lt = config.n_action_tokens, layout.length, layout.instruction_len
    uses = {}
    counts = [(1, 'AR'), (L, 'full diffusion'), (P, 'prefill'), (Lt, 'instruction prefill'),
              (P - Lt, 'observation prefill'), (P + L, 'prefill + full diffusion')]
    if Lt:
        counts.append((P - Lt + L, 'observation prefill + full diffusion'))
    for B in config.block_sizes:  # every block size the policy was trained with (a decoding override)
        counts += [(B, 'refine'), (2 * B, 'fused commit + refine'), (P + B, 'prefill + refine')]
        if Lt:
            counts.append((P - Lt + B, 'observation prefill + refine'))
    for n, what in counts:
        if 0 < n <= config.max_seq_len:
            uses.setdefault(n, []).append(what)
    return {n: ', '.join(w) for n, w in sorted(uses.items())}


def profiles(config) -> list:
    """Exact profiles for `token_counts`, then the catch-all range profile [1, T_max]."""
    out = [Profile(n, n, n) for n in token_counts(config)]
    out.append(Profile(1, min(2 * config.block_size, config.max_seq_len), config.max_seq_len))  # the rest
    return out


def pick_profile(profiles_: list, n: int) -> int:
    """Index of the exact profile for n, else of the narrowest profile covering it."""
    covering = [i for i, p in enumerate(profiles_) if p.covers(n)]
    if not covering:
        raise ValueError(f'no TensorRT optimization profile covers {n} tokens: {profiles_}')
    return min(covering, key=lambda i: profiles_[i].max - profiles_[i].min)


def profile_shapes(graph_spec, profile: Profile, t_max: int) -> dict:
    """{input name: (min shape, opt shape, max shape)} for every input of `graph_spec` with a symbolic dim (n varies
    over the profile, past = t_max)."""
    return {t.name: (t.concrete(profile.min, t_max), t.concrete(profile.opt, t_max), t.concrete(profile.max, t_max))
            for t in graph_spec.inputs if any(isinstance(d, str) for d in t.shape)}


def check_profiles(spec) -> list:
    """Static checks of a policy folder's profiles (no GPU): well-formed, inside [1, T_max], every decoder shape
    covered by an exact profile, every dynamic input's shapes consistent. -> the profiles."""
    cfg, graph = spec.config, spec.graphs['backbone']
    out = profiles(cfg)
    for p in out:
        if not 1 <= p.min <= p.opt <= p.max <= cfg.max_seq_len:
            raise ValueError(f'malformed profile {p} (T_max {cfg.max_seq_len})')
        for name, shapes in profile_shapes(graph, p, cfg.max_seq_len).items():
            if any(d < 1 for s in shapes for d in s) or not all(a <= b <= c for a, b, c in zip(*shapes)):
                raise ValueError(f'profile {p}: input {name} shapes {shapes} are not ordered min <= opt <= max')
    for n in token_counts(cfg):
        if not out[pick_profile(out, n)].exact:
            raise ValueError(f'{n} tokens ({token_counts(cfg)[n]}) has no exact profile')
    return out
