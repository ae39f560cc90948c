"""Why relation questions were at chance in the built-in model, and what fixed them: stage 2 of the recipe on the
shipped tower with one change at a time, then a look at what the hidden state after the supervised layer holds.
Not part of the package; it patches private pieces of ``tools/builtin_recipe.py`` for one run. One main torch thread.

    python experiments/relation_lab.py --steps 700                        # the recipe
    python experiments/relation_lab.py --steps 700 --place-weight 0 --margin-scale 0 --no-relation-word

After training it prints validation accuracy per type (every token visible), then on 400 validation relation
questions: the answer accuracy, the share of the readout's four places (row and column of both objects,
rounded) that are right ("place"), how often the sign of the relation-margin readout and the relation-word
readout are right; and a linear probe (70/30 split) of the object centre patches' grid row and column from the
tower's features, the projected tokens, and the values of the supervised heads.

Options (the recipe's value in ``tools/builtin_recipe.py`` otherwise):
* ``--place-weight W``: weight of the object tokens' row and column words in the feature alignment;
* ``--margin-scale S``: scale of the relation margin the readout must give (0: no margin target);
* ``--no-relation-word``: no relation-word target;
* ``--attend-layer L``: supervise layer L's heads instead of layer 2.
"""
from __future__ import annotations

import argparse
import time

import torch

import tools.builtin_recipe as T
from robustvtc.data import synthetic as S
from robustvtc.models import load_model


def patch_labels(margin_scale: float, relation_word: bool) -> None:
    """Change the readout's relation targets: margin scale (0 = none, NaN) and relation word (False = -100)."""
    base = T._referent_labels

    def labels(scenes, most):
        places, kinds = base(scenes, most)
        places[..., 4] *= margin_scale / T.MARGIN_SCALE
        if not margin_scale:
            places[..., 4] = float("nan")
        if not relation_word:
            kinds[..., 4] = -100
        return places, kinds
    T._referent_labels = labels


@torch.no_grad()
def inspect(adapter, readout, attend_layer: int) -> None:
    model = adapter.model.eval()
    lm, embed = model.model.language_model, model.get_input_embeddings()
    yes_no = [adapter.continuation_ids("is there a red circle ?", w)[0] for w in ("yes", "no")]
    hits: dict[str, list[float]] = {"answer": [], "place": []}
    for s in (S.generate_sample(i, "val", qtype="relation") for i in range(400)):
        pre, suf = adapter._prompt_ids(s.question)
        visual = adapter.project(adapter.encode(S.to_pixels([s])).features)
        out = lm(inputs_embeds=torch.cat([embed(torch.tensor(pre))[None], visual, embed(torch.tensor(suf))[None]], 1),
                 output_hidden_states=True)
        parts = readout(out.hidden_states[attend_layer + 1][0, -1]).split(T.READOUT_SIZES)
        a, b = s.objects[s.referents[0]], s.objects[s.referents[-1]]
        truth = torch.tensor([a.cell // S.GRID, a.cell % S.GRID, b.cell // S.GRID, b.cell % S.GRID]).float()
        hits["place"].append((parts[0][:4].round() == truth).float().mean().item())
        margin, word = T.relation_margin(s)
        hits.setdefault("margin sign", []).append(float((parts[0][4] > 0).item() == (margin > 0)))
        hits.setdefault("relation word", []).append(float(parts[-1].argmax().item() == word))
        logits = model.lm_head(lm.norm(out.last_hidden_state[0, -1]))[yes_no]
        hits["answer"].append(float((logits[0] > logits[1]).item() == (s.answer == "yes")))
    for name, values in hits.items():
        print(f"relation questions (n={len(values)}): {name} {sum(values) / len(values):.3f}")


@torch.no_grad()
def _place_features(adapter, attend_layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each object's centre patch in 300 validation scenes: tower feature, projected token, and the value of
    the supervised heads (0 and 1) of ``attend_layer``; with the object's grid cell."""
    lm, embed = adapter.model.model.language_model, adapter.model.get_input_embeddings()
    samples = S.generate_dataset(300, "val")
    feats: dict[str, list[torch.Tensor]] = {"tower": [], "projected": [], "head values": []}
    cells = []
    for i in range(0, len(samples), 50):
        chunk = samples[i:i + 50]
        tower = adapter.encode(S.to_pixels(chunk)).features
        visual = adapter.project(tower)
        pre = adapter._prompt_ids(chunk[0].question)[0]
        h = torch.cat([embed(torch.tensor(pre))[None].expand(len(chunk), -1, -1), visual], 1)
        state = lm(inputs_embeds=h, output_hidden_states=True).hidden_states[attend_layer][:, len(pre):]
        layer = lm.layers[attend_layer]
        values = layer.self_attn.v_proj(layer.input_layernorm(state))[..., :2 * layer.self_attn.head_dim]
        for b, s in enumerate(chunk):
            for o in s.objects:
                p = int(o.cy // S.PATCH_SIZE) * (S.IMAGE_SIZE // S.PATCH_SIZE) + int(o.cx // S.PATCH_SIZE)
                for name, x in (("tower", tower), ("projected", visual), ("head values", values)):
                    feats[name].append(x[b, p])
                cells.append(o.cell)
    return {k: torch.stack(v) for k, v in feats.items()}, torch.tensor(cells)


def probe_places(adapter, attend_layer: int) -> None:
    feats, cells = _place_features(adapter, attend_layer)
    cut = int(len(cells) * 0.7)
    for name, x in feats.items():
        x = (x - x.mean(0)) / (x.std(0) + 1e-5)
        accuracy = []
        for y in (cells // S.GRID, cells % S.GRID):
            head = torch.nn.Linear(x.shape[1], S.GRID)
            opt = torch.optim.Adam(head.parameters(), lr=0.02)
            for _ in range(300):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(head(x[:cut]), y[:cut]).backward()
                opt.step()
            accuracy.append((head(x[cut:]).argmax(-1) == y[cut:]).float().mean().item())
        print(f"linear probe of object centres' place ({len(cells) - cut} held out), {name}: "
              f"row {accuracy[0]:.3f}  column {accuracy[1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--place-weight", type=float, default=T.TrainConfig.place_weight)
    parser.add_argument("--margin-scale", type=float, default=T.MARGIN_SCALE)
    parser.add_argument("--no-relation-word", dest="relation_word", action="store_false")
    parser.add_argument("--attend-layer", type=int, default=T.TrainConfig.attend_layer)
    args = parser.parse_args()
    torch.set_num_threads(1)
    patch_labels(args.margin_scale, args.relation_word)
    cfg = T.TrainConfig(vision_steps=0, steps=args.steps, eval_every=max(args.steps // 2, 1),
                        place_weight=args.place_weight, attend_layer=args.attend_layer)
    torch.manual_seed(0)
    adapter = T.new_builtin(0)
    adapter.model.model.vision_tower.load_state_dict(load_model("builtin").model.model.vision_tower.state_dict())
    adapter.model.train().requires_grad_(True)
    made: list[torch.nn.Linear] = []  # the recipe's readout is created inside _train_llava; keep a handle on it
    linear = torch.nn.Linear

    class KeptLinear(linear):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    torch.nn.Linear = KeptLinear
    try:
        T._train_llava(adapter, cfg, lambda line: print(line, flush=True) if "val" in line else None, time.time())
    finally:
        torch.nn.Linear = linear
    inspect(adapter, made[-1], args.attend_layer)
    probe_places(adapter, args.attend_layer)  # outside inspect's no_grad: the probes train


if __name__ == "__main__":
    main()
