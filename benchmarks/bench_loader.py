"""Read + preprocess throughput of mmv.data against MONAI's usual chain, on the same files, with and without the cache.

CT: ``.nii.gz`` volumes (int16, a body-shaped phantom with noise, CT-like size), read and preprocessed to
1.5 x 0.75 x 0.75 mm and [-1000, 1000] HU -> [-1, 1]:

- mmv: ``read_image`` (ITK) -> ``CtPreprocess`` (window, trilinear resampling).
- mmv cached: the same through ``PreprocessCache`` once warm (memory-mapped ``.npy``).
- MONAI: ``LoadImage`` (NibabelReader) -> ``EnsureChannelFirst`` -> ``Orientation("LPS")`` ->
  ``Spacing(pixdim)`` -> ``ScaleIntensityRange(-1000, 1000, -1, 1, clip=True)``.

X-ray: JPEG radiographs resized to a 512-pixel short side and normalised by robust percentiles (mmv
``XrayPreprocess``; MONAI ``LoadImage`` (PILReader) -> ``EnsureChannelFirst`` -> ``Resize`` ->
``ScaleIntensityRangePercentiles``).

Every chain touches all output voxels (a sum), and each is timed over the whole file set ``--repeats``
times, interleaved, keeping the median. The files are written once and stay in the page cache, so the
figures measure decoding and preprocessing, not the disk. MONAI is optional (``pip install -e .[bench]``);
without it only the mmv rows are printed.

    python benchmarks/bench_loader.py --json benchmarks/out/loader.json   # plot: benchmarks/out/loader_throughput.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmv.data import CtPreprocess, PreprocessCache, XrayPreprocess, read_image

CT_SPACING_ZYX = (1.5, 0.75, 0.75)
HU_WINDOW = (-1000.0, 1000.0)


def write_ct_volumes(directory: Path, count: int, shape_xyz: tuple[int, int, int], seed: int) -> list[Path]:
    """Chest-CT-like int16 volumes: air at -1024 HU around an elliptic body of soft tissue and noise."""
    import itk

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape_xyz
    y, x = np.mgrid[0:ny, 0:nx]
    body = ((x - nx / 2) / (0.42 * nx)) ** 2 + ((y - ny / 2) / (0.32 * ny)) ** 2 <= 1
    paths = []
    for index in tqdm(range(count), desc="writing CT volumes", leave=False):
        volume = np.full((nz, ny, nx), -1024, dtype=np.int16)
        noise = rng.normal(40, 30, size=(nz, ny, nx)).astype(np.int16)
        volume[:, body] = noise[:, body]
        image = itk.image_from_array(volume)
        image.SetSpacing((0.7, 0.7, 1.25))
        path = directory / f"ct_{index}.nii.gz"
        itk.imwrite(image, str(path), compression=True)
        paths.append(path)
    return paths


def write_radiographs(directory: Path, count: int, shape: tuple[int, int], seed: int) -> list[Path]:
    import itk

    rng = np.random.default_rng(seed)
    paths = []
    for index in tqdm(range(count), desc="writing radiographs", leave=False):
        smooth = np.cumsum(rng.normal(0, 1, size=shape), axis=0)
        pixels = np.clip((smooth - smooth.min()) / np.ptp(smooth) * 255, 0, 255).astype(np.uint8)
        path = directory / f"xray_{index}.jpg"
        itk.imwrite(itk.image_from_array(pixels), str(path))
        paths.append(path)
    return paths


def mmv_ct_chain():
    preprocess = CtPreprocess(spacing=CT_SPACING_ZYX, window=HU_WINDOW)
    return lambda path: float(preprocess(read_image(path)).pixels.sum())


def mmv_cached_chain(cache: PreprocessCache):
    preprocess = CtPreprocess(spacing=CT_SPACING_ZYX, window=HU_WINDOW)

    def run(path: Path) -> float:
        image = cache.get_or_compute(path, repr(preprocess), lambda: preprocess(read_image(path)))
        return float(image.pixels.sum())

    return run


def mmv_xray_chain():
    preprocess = XrayPreprocess(short_side=512)
    return lambda path: float(preprocess(read_image(path)).pixels.sum())


def monai_ct_chain():
    from monai import transforms

    chain = transforms.Compose(
        [
            transforms.LoadImage(reader="NibabelReader", image_only=True),
            transforms.EnsureChannelFirst(),
            transforms.Orientation(axcodes="LPS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            transforms.Spacing(pixdim=CT_SPACING_ZYX[::-1], mode="bilinear"),
            transforms.ScaleIntensityRange(a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=-1.0, b_max=1.0, clip=True),
        ]
    )
    return lambda path: float(torch.as_tensor(chain(str(path))).sum())


def monai_xray_chain(output_shape: tuple[int, int]):
    from monai import transforms

    chain = transforms.Compose(
        [
            transforms.LoadImage(reader="PILReader", image_only=True),
            transforms.EnsureChannelFirst(),
            # PILReader returns (columns, rows): the output size is given in that order.
            transforms.Resize(spatial_size=output_shape[::-1], mode="bilinear", anti_aliasing=True),
            transforms.ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=-1.0, b_max=1.0, clip=True),
        ]
    )
    return lambda path: float(torch.as_tensor(chain(str(path))).sum())


def time_epoch(chain, paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        chain(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=4, help="CT volumes in the file set")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=(512, 512, 160), metavar=("X", "Y", "Z"))
    parser.add_argument("--radiographs", type=int, default=8)
    parser.add_argument("--xray-shape", type=int, nargs=2, default=(3000, 2500), metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--plot", type=Path, default=Path(__file__).parent / "out" / "loader_throughput.png", help="PNG bar chart"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    try:
        import monai

        monai_version = monai.__version__
    except ImportError:
        monai_version = None

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as scratch:
        scratch = Path(scratch)
        ct_paths = write_ct_volumes(scratch, args.volumes, tuple(args.ct_shape), seed=0)
        xray_paths = write_radiographs(scratch, args.radiographs, tuple(args.xray_shape), seed=1)
        cache = PreprocessCache(scratch / "cache")
        chains = {
            "CT mmv": (mmv_ct_chain(), ct_paths),
            "CT mmv cached": (mmv_cached_chain(cache), ct_paths),
            "X-ray mmv": (mmv_xray_chain(), xray_paths),
        }
        if monai_version is not None:
            chains["CT MONAI"] = (monai_ct_chain(), ct_paths)
            xray_output = XrayPreprocess(short_side=512).output_shape(tuple(args.xray_shape), (1.0, 1.0))
            chains["X-ray MONAI"] = (monai_xray_chain(xray_output), xray_paths)
        # Warm-up: loads ITK and MONAI, fills the cache and the page cache.
        for chain, paths in tqdm(chains.values(), desc="warm-up", leave=False):
            chain(paths[0])
        time_epoch(chains["CT mmv cached"][0], ct_paths)
        timings = {name: [] for name in chains}
        for _ in tqdm(range(args.repeats), desc="timed epochs", leave=False):
            for name, (chain, paths) in chains.items():
                timings[name].append(time_epoch(chain, paths))

    rates = {name: len(chains[name][1]) / statistics.median(seconds) for name, seconds in timings.items()}
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "monai": monai_version,
        "ct_shape_xyz": list(args.ct_shape),
        "xray_shape": list(args.xray_shape),
        "per_second": rates,
        "seconds_per_epoch": {name: statistics.median(seconds) for name, seconds in timings.items()},
    }
    print(f"{'chain':<16}{'items/s':>10}{'s/epoch':>10}   vs MONAI")
    for name, rate in rates.items():
        baseline = rates.get(name.split()[0] + " MONAI")
        relative = f"{rate / baseline:6.2f}x" if baseline and "MONAI" not in name else ""
        print(f"{name:<16}{rate:>10.2f}{results['seconds_per_epoch'][name]:>10.2f}   {relative}")
    print(f"cached / uncached CT epoch: {rates['CT mmv cached'] / rates['CT mmv']:.1f}x faster")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(rates, args.plot)
    print(f"plot: {args.plot}")


def plot(rates: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    names = list(rates)
    axis.barh(names, [rates[name] for name in names], color=["C0" if "mmv" in n else "C7" for n in names])
    axis.set_xscale("log")
    axis.set_xlabel("items per second (log scale)")
    axis.set_title("read + preprocess throughput")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
