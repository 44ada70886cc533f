"""Tiny on-disk copies of the public medical dataset layouts (MSCMRseg, ACDC, MM-WHS, DRIVE, IOSTAR).

Volumes are 16 x 16 x 4 with realistic headers: anisotropic voxels, non-identity affines (flipped / axis-
swapped), int16 and float32 images and each dataset's real raw label values. Every builder returns the
expected CLASS-INDEX label of each case in the canonical (RAS) orientation, computed by hand from the
affine (not by the code under test), keyed by case name, so tests can compare voxel by voxel.
"""

from __future__ import annotations

import pathlib

import nibabel as nib
import numpy as np
from PIL import Image

SHAPE = (16, 16, 4)


def _affine(kind: int, zooms: tuple[float, float, float]) -> np.ndarray:
  """Three header styles; their canonical reorientation is written out in `_to_canonical`."""
  a = np.eye(4)
  sx, sy, sz = zooms
  if kind == 0:  # RAS already, offset origin
    a[:3, :3] = np.diag([sx, sy, sz])
  elif kind == 1:  # LPS-style (DICOM converters): x and y flipped
    a[:3, :3] = np.diag([-sx, -sy, sz])
  else:  # in-plane axes swapped: voxel axis 1 -> +x, voxel axis 0 -> -y
    a[:3, :3] = np.array([[0.0, sy, 0.0], [-sx, 0.0, 0.0], [0.0, 0.0, sz]])
  a[:3, 3] = (-60.5, 42.0, -17.25)
  return a


def _to_canonical(raw: np.ndarray, kind: int) -> np.ndarray:
  """The array nibabel's closest-canonical (RAS) image holds, for the affine of `_affine(kind)`."""
  if kind == 0:
    return raw
  if kind == 1:
    return raw[::-1, ::-1, :]
  return np.transpose(raw, (1, 0, 2))[:, ::-1, :]


def class_volume(rng: np.random.Generator, num_classes: int) -> np.ndarray:
  """int [16, 16, 4] class indices: foreground blocks on slices 1..3, slice 0 all background."""
  c = np.zeros(SHAPE, np.int32)
  dx, dy = rng.integers(0, 3, size=2)
  blocks = [(2, 6, 2, 6), (2, 6, 8, 12), (9, 13, 2, 6), (9, 13, 8, 12), (6, 9, 6, 9), (0, 2, 13, 16),
            (13, 16, 0, 3)]
  for k in range(1, num_classes):
    x0, x1, y0, y1 = blocks[k - 1]
    c[x0 + dx : x1 + dx, y0 + dy : y1 + dy, 1:] = k
  return c


def _image(rng: np.random.Generator, classes: np.ndarray, dtype, scale: float, offset: float) -> np.ndarray:
  img = rng.normal(0.0, 5.0, SHAPE) + offset + scale * (1 + classes)
  return img.astype(dtype)


def _save(path: pathlib.Path, array: np.ndarray, affine: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  img = nib.Nifti1Image(array, affine)
  img.header.set_xyzt_units('mm')
  nib.save(img, str(path))


def _encode(classes: np.ndarray, raw_values: dict[int, int]) -> np.ndarray:
  """class indices -> raw label values (raw_values: class index -> raw value)."""
  lut = np.zeros(max(raw_values) + 1, np.int16)
  for k, v in raw_values.items():
    lut[k] = v
  return lut[classes]


# MSCMRseg -------------------------------------------------------------------------------------------------
# Class order of the loaders: 0 background, 1 LV, 2 RV, 3 Myo.
MSCMR_CHALLENGE = {0: 0, 1: 500, 2: 600, 3: 200}
MSCMR_CONSECUTIVE = {0: 0, 1: 3, 2: 1, 3: 2}  # 1 = RV, 2 = Myo, 3 = LV (ACDC convention)


def make_mscmr(root: pathlib.Path, n_subjects: int = 6, release: str = 'challenge',
               sequences=('C0', 'T2', 'DE'), seed: int = 0) -> dict[str, np.ndarray]:
  """root/c0t2lge/subjectN_{seq}.nii.gz + root/labels/subjectN_{seq}_manual.nii.gz, N = 1..n_subjects."""
  rng = np.random.default_rng(seed)
  raw_values = MSCMR_CHALLENGE if release == 'challenge' else MSCMR_CONSECUTIVE
  expected = {}
  for n in range(1, n_subjects + 1):
    for j, seq in enumerate(sequences):
      kind = (n + j) % 3
      zooms = (0.75, 0.75, 10.0) if seq == 'DE' else (1.5, 1.5, 8.0)
      classes = class_volume(rng, 4)
      dtype = np.int16 if seq != 'T2' else np.float32
      affine = _affine(kind, zooms)
      _save(root / 'c0t2lge' / f'subject{n}_{seq}.nii.gz', _image(rng, classes, dtype, 100.0, 50.0), affine)
      _save(root / 'labels' / f'subject{n}_{seq}_manual.nii.gz', _encode(classes, raw_values), affine)
      expected[f'subject{n}_{seq}'] = _to_canonical(classes, kind)
  return expected


# ACDC -----------------------------------------------------------------------------------------------------
ACDC_RAW = {0: 0, 1: 3, 2: 1, 3: 2}  # class (bg, LV, RV, Myo) -> ACDC value (3 = LV, 1 = RV, 2 = Myo)


def make_acdc(root: pathlib.Path, n_patients: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
  """root/{training,testing}/patientNNN/{Info.cfg, patientNNN_4d, _frameFF, _frameFF_gt}.nii.gz."""
  rng = np.random.default_rng(seed)
  expected = {}
  for p in range(1, n_patients + 1):
    folder = root / ('training' if p <= n_patients - 2 else 'testing') / f'patient{p:03d}'
    ed, es = 1, 9 + p
    folder.mkdir(parents=True)
    info = f'ED: {ed}\nES: {es}\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n'
    (folder / 'Info.cfg').write_text(info)
    kind = p % 3
    affine = _affine(kind, (1.5625, 1.5625, 10.0))
    _save(folder / f'patient{p:03d}_4d.nii.gz', rng.normal(size=(*SHAPE, 3)).astype(np.float32), affine)
    for frame in (ed, es):
      classes = class_volume(rng, 4)
      name = f'patient{p:03d}_frame{frame:02d}'
      _save(folder / f'{name}.nii.gz', _image(rng, classes, np.int16, 80.0, 20.0), affine)
      _save(folder / f'{name}_gt.nii.gz', _encode(classes, ACDC_RAW).astype(np.uint8), affine)
      expected[name] = _to_canonical(classes, kind)
    # An unlabelled middle frame, as in the release: must be ignored.
    _save(folder / f'patient{p:03d}_frame05.nii.gz', _image(rng, classes, np.int16, 80.0, 20.0), affine)
  return expected


# MM-WHS ---------------------------------------------------------------------------------------------------
# Class order: bg, LV, RV, LA, RA, Myo, Ao, PA.
MMWHS_RAW = {0: 0, 1: 500, 2: 600, 3: 420, 4: 550, 5: 205, 6: 820, 7: 850}


def make_mmwhs(root: pathlib.Path, n_mr: int = 4, n_ct: int = 6, seed: int = 2) -> dict[str, np.ndarray]:
  """root/{mr,ct}_train/{mr,ct}_train_10NN_{image,label}.nii.gz, plus an unlabelled mr_test volume.

  ct_train_1001 stores its LA partly as 421 (as some released files do).
  """
  rng = np.random.default_rng(seed)
  expected = {}
  for mod, count, zooms, dtype in (('mr', n_mr, (1.0, 1.0, 1.6), np.float32),
                                   ('ct', n_ct, (0.4, 0.4, 0.6), np.int16)):
    for i in range(count):
      name = f'{mod}_train_{1001 + i}'
      kind = i % 3
      affine = _affine(kind, zooms)
      classes = class_volume(rng, 8)
      raw = _encode(classes, MMWHS_RAW)
      if name == 'ct_train_1001':
        raw[(classes == 3) & (np.arange(16)[:, None, None] % 2 == 0)] = 421
      offset = -1000.0 if mod == 'ct' else 0.0
      image = _image(rng, classes, dtype, 150.0, offset)
      _save(root / f'{mod}_train' / f'{name}_image.nii.gz', image, affine)
      _save(root / f'{mod}_train' / f'{name}_label.nii.gz', raw, affine)
      expected[name] = _to_canonical(classes, kind)
  _save(root / 'mr_test' / 'mr_test_2001_image.nii.gz', rng.normal(size=SHAPE).astype(np.float32), np.eye(4))
  return expected


# Retina ---------------------------------------------------------------------------------------------------
DRIVE_HW = (584, 565)  # the released DRIVE images: 565 wide, 584 high
IOSTAR_HW = (1024, 1024)  # the released IOSTAR images (30 of them)


def vessel_mask(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
  """bool [H, W]: a few straight 'vessels' (rows and columns), different per image; at full resolution
  (side > 100) they are 1/100 of the side wide, so they survive resizing to the model size."""
  m = np.zeros(hw, bool)
  w = max(1, min(hw) // 100)
  r0 = int(rng.integers(1, hw[0] - w))
  m[r0:r0 + w, :] = True
  c0 = int(rng.integers(1, hw[1] - w))
  m[:, c0:c0 + w] = True
  r1 = int(rng.integers(1, hw[0] - w))
  m[r1:r1 + w, 2:] = True
  return m


def _fundus(rng: np.random.Generator, vessels: np.ndarray) -> np.ndarray:
  rgb = np.stack([np.full(vessels.shape, v) for v in (180.0, 90.0, 40.0)], -1)
  rgb -= 60.0 * vessels[..., None]
  return np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)


def _fov(hw: tuple[int, int]) -> np.ndarray:
  yy, xx = np.mgrid[: hw[0], : hw[1]]
  return (yy - hw[0] / 2) ** 2 + (xx - hw[1] / 2) ** 2 <= (min(hw) / 2) ** 2


def make_drive(root: pathlib.Path, hw: tuple[int, int] = (18, 20), seed: int = 3, training=range(21, 25),
               test=range(1, 3)) -> dict[str, np.ndarray]:
  """DRIVE: {training,test}/{images,1st_manual,mask}/..., numbers 21-24 (training) and 01-02 (test).

  The release: hw=DRIVE_HW, training=range(21, 41), test=range(1, 21) (40 labelled images)."""
  rng = np.random.default_rng(seed)
  expected = {}
  for part, numbers in (('training', training), ('test', test)):
    for d in ('images', '1st_manual', 'mask', '2nd_manual'):
      (root / part / d).mkdir(parents=True, exist_ok=True)
    for n in numbers:
      vessels = vessel_mask(rng, hw)
      Image.fromarray(_fundus(rng, vessels)).save(root / part / 'images' / f'{n:02d}_{part}.tif')
      manual = Image.fromarray(vessels.astype(np.uint8) * 255)
      manual.save(root / part / '1st_manual' / f'{n:02d}_manual1.gif')
      Image.fromarray(_fov(hw).astype(np.uint8) * 255).save(root / part / 'mask' / f'{n:02d}_{part}_mask.gif')
      if part == 'test':  # second observer: must be ignored
        Image.fromarray(np.zeros(hw, np.uint8)).save(root / part / '2nd_manual' / f'{n:02d}_manual2.gif')
      expected[f'{n:02d}_{part}'] = vessels
  return expected


def make_iostar(root: pathlib.Path, n: int = 6, hw: tuple[int, int] = (16, 16), seed: int = 4
                ) -> dict[str, np.ndarray]:
  """IOSTAR: image/STAR NN_OSC.jpg, GT/STAR NN_OSC_GT.png (0/255), mask/STAR NN_OSC_Mask.png, AV_GT/."""
  rng = np.random.default_rng(seed)
  expected = {}
  for d in ('image', 'GT', 'mask', 'AV_GT'):
    (root / d).mkdir(parents=True, exist_ok=True)
  for i in range(1, n + 1):
    stem = f'STAR {i:02d}_{"OSC" if i % 2 else "ODC"}'
    vessels = vessel_mask(rng, hw)
    Image.fromarray(_fundus(rng, vessels)).save(root / 'image' / f'{stem}.jpg', quality=95)
    Image.fromarray(vessels.astype(np.uint8) * 255).save(root / 'GT' / f'{stem}_GT.png')
    if i != n:  # the last case has no FOV file: full-image FOV
      Image.fromarray(_fov(hw).astype(np.uint8) * 255).save(root / 'mask' / f'{stem}_Mask.png')
    Image.fromarray(np.zeros((*hw, 3), np.uint8)).save(root / 'AV_GT' / f'{stem}_AV.png')
    expected[stem] = vessels
  return expected
