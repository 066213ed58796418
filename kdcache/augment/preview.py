"""`kdcache preview`: a picture of teacher-side and FFCV-side renders of the same views, side by side.

teacher_side_views and ffcv_side_views render any views (i, s), mixed ones included (a mixed view needs
its partner's view too): verify --replay and the pixel-equality tests use them as well."""

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from kdcache.augment.params import ParamLayout, view_params
from kdcache.augment.recipe import ViewRecipe
from kdcache.augment.render import decode_jpeg, mix_views, render_views
from kdcache.data.dataset import PreparedSplit
from kdcache.files import atomic_file


def _partner(params: np.ndarray, layout: ParamLayout, i: int) -> int:
    return i if layout.mix_offset is None else i + int(params[i, layout.mix_offset + 1])


def teacher_side_views(split: PreparedSplit, indices: Sequence[int], params_by_seed: dict, recipe: ViewRecipe) -> dict:
    """{(i, s): view} rendered from the shard bytes, as dump-teacher renders them (mixed with the partner's
    view when the recipe mixes). params_by_seed: {s: (N, P) rows of every sample}."""
    layout = ParamLayout.of(recipe)
    reader = split.jpeg_reader()
    decoded = {}

    def own_view(i, s):
        if i not in decoded:
            decoded[i] = decode_jpeg(reader[i], *split.sizes[i], what=f"{split.name} sample {i}")
        return render_views(decoded[i], params_by_seed[s][i], recipe.size, layout)[0]

    out = {}
    for i in indices:
        for s, params in params_by_seed.items():
            j = _partner(params, layout, i)
            view = own_view(i, s)
            if j != i:
                other = own_view(j, s)
                lower, upper = (view, other) if i < j else (other, view)
                mix_views(lower, upper, params[min(i, j)], layout)   # as the dump: from the pair's lower member
            out[(i, s)] = view
    return out


def replay_loader(split: PreparedSplit, recipe: ViewRecipe, batch_size: int = 64):
    """One student-side loader for any views of this split (each pass loads only the samples it is given).
    Reuse it: every FFCV pipeline built in a process compiles anew, and numba 0.68 has hung a Loader whose
    process had built and dropped many (docs/views.md)."""
    from kdcache.augment.loader import ReplayLoader
    return ReplayLoader(split.beton_path, split.num_samples, recipe.size, batch_size=batch_size, drop_last=False,
                        layout=ParamLayout.of(recipe), subsets=True)


def ffcv_side_views(split: PreparedSplit, indices: Sequence[int], params_by_seed: dict, recipe: ViewRecipe,
                    loader=None) -> dict:
    """{(i, s): view} replayed by the student's FFCV loader, one pass per seed over the samples asked for
    and their partners. `loader`: a replay_loader(split, recipe) to reuse."""
    layout = ParamLayout.of(recipe)
    loader = loader or replay_loader(split, recipe)
    wanted = set(int(i) for i in indices)
    out = {}
    for s, params in params_by_seed.items():
        active = np.array(sorted(wanted | {_partner(params, layout, i) for i in wanted}))
        loader.set_views(params, active)
        for images, _, idx in loader:
            for image, i in zip(images.permute(0, 2, 3, 1).numpy(), idx.tolist()):
                if i in wanted:
                    out[(i, s)] = image.copy()
    return out


def preview(split: PreparedSplit, recipe: ViewRecipe, global_seed: int, samples: int, seeds: int, out: Path) -> dict:
    n = split.num_samples
    indices = sorted(set(np.linspace(0, n - 1, min(samples, n)).round().astype(int).tolist()))
    everyone = np.arange(n)
    params_by_seed = {s: view_params(recipe, global_seed, s, everyone, split.sizes[:, 0], split.sizes[:, 1], n)
                      for s in range(seeds)}
    teacher = teacher_side_views(split, indices, params_by_seed, recipe)
    student = ffcv_side_views(split, indices, params_by_seed, recipe)
    identical = sum(np.array_equal(teacher[k], student[k]) for k in teacher)

    zoom = max(1, 96 // recipe.size)
    cell = recipe.size * zoom
    pad, header = 4, 28
    pair_w = 2 * cell + pad
    width = seeds * (pair_w + 3 * pad) + pad
    height = header + len(indices) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for s in range(seeds):
        x0 = pad + s * (pair_w + 3 * pad)
        draw.text((x0, 2), f"seed {s}", fill=(0, 0, 0))
        draw.text((x0, 14), "teacher | ffcv", fill=(90, 90, 90))
        for row, i in enumerate(indices):
            y0 = header + row * (cell + pad)
            for col, view in enumerate((teacher[(i, s)], student[(i, s)])):
                tile = Image.fromarray(view).resize((cell, cell), Image.NEAREST)
                canvas.paste(tile, (x0 + col * (cell + pad), y0))
            if not np.array_equal(teacher[(i, s)], student[(i, s)]):
                draw.rectangle([x0 - 2, y0 - 2, x0 + pair_w + 1, y0 + cell + 1], outline=(255, 0, 0), width=2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        canvas.save(tmp, format=out.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    return {"out": str(out), "views": len(teacher), "identical": int(identical), "indices": indices}
