"""How much latent actions tell about true actions: confusion, NMI, best assignment.

Pure numpy (scipy for the assignment), on the host. Conventions: a confusion matrix has one
row per latent action and one column per true action, confusion[a, b] = how often latent
action a was inferred for a transition whose true action was b.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
from PIL import Image
from PIL import ImageDraw


def confusion_matrix(latent: np.ndarray, true: np.ndarray, num_latent: int,
                     num_true: int) -> np.ndarray:
  """Counts (num_latent, num_true) int64 of (latent, true) pairs of equal-shape int arrays.

  Pairs with a true action outside [0, num_true) (e.g. -1: unknown, padding) are skipped;
  a latent action outside [0, num_latent) is an error.
  """
  latent, true = np.asarray(latent).reshape(-1), np.asarray(true).reshape(-1)
  if latent.shape != true.shape:
    raise ValueError(f"latent and true actions differ in size: {latent.shape} vs {true.shape}")
  keep = (true >= 0) & (true < num_true)
  latent, true = latent[keep].astype(np.int64), true[keep].astype(np.int64)
  if latent.size and (latent.min() < 0 or latent.max() >= num_latent):
    raise ValueError(f"latent actions must be in [0, {num_latent}); got "
                     f"[{latent.min()}, {latent.max()}]")
  counts = np.bincount(latent * num_true + true, minlength=num_latent * num_true)
  return counts.reshape(num_latent, num_true)


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-np.sum(p * np.log(p)))


def normalized_mutual_information(confusion: np.ndarray) -> float:
  """NMI = I(latent; true) / ((H(latent) + H(true)) / 2), in [0, 1].

  The arithmetic-mean normalisation (sklearn's default `average_method='arithmetic'`): 1
  when one labelling is a relabelling of the other, 0 when they are independent. 0 when
  either labelling is constant (no information either way) or the matrix is empty.
  """
  confusion = np.asarray(confusion, np.float64)
  total = confusion.sum()
  if total <= 0:
    return 0.0
  h_latent, h_true = _entropy(confusion.sum(1)), _entropy(confusion.sum(0))
  if h_latent == 0.0 or h_true == 0.0:
    return 0.0
  joint = confusion / total
  outer = np.outer(joint.sum(1), joint.sum(0))
  nz = joint > 0
  mutual = float(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])))
  return float(np.clip(mutual / (0.5 * (h_latent + h_true)), 0.0, 1.0))


def best_assignment(confusion: np.ndarray) -> np.ndarray:
  """Latent action for each true action, one-to-one, maximising the matched count.

  Hungarian algorithm (scipy.optimize.linear_sum_assignment). Returns int64 (num_true,):
  entry b is the latent action assigned to true action b, or -1 when there are fewer latent
  than true actions and b is left unmatched.
  """
  confusion = np.asarray(confusion)
  rows, cols = scipy.optimize.linear_sum_assignment(confusion, maximize=True)
  assignment = np.full(confusion.shape[1], -1, np.int64)
  assignment[cols] = rows
  return assignment


def assignment_accuracy(confusion: np.ndarray) -> float:
  """Fraction of transitions whose latent action is the one `best_assignment` gives their
  true action (0 for an empty matrix)."""
  confusion = np.asarray(confusion)
  total = confusion.sum()
  if total <= 0:
    return 0.0
  assignment = best_assignment(confusion)
  matched = sum(confusion[a, b] for b, a in enumerate(assignment) if a >= 0)
  return float(matched / total)


def plurality_latent(confusion: np.ndarray) -> np.ndarray:
  """The latent action inferred most often for each true action: int64 (num_true,).

  Entry b is argmax over latent actions of confusion[:, b] (ties: the lowest index), or -1
  when true action b never occurred (its column is empty). Two true actions with the same
  plurality latent action are, to the LAM, mostly the same action.
  """
  confusion = np.asarray(confusion)
  plurality = np.argmax(confusion, axis=0).astype(np.int64)
  plurality[confusion.sum(axis=0) == 0] = -1
  return plurality


def latent_for_true(confusion: np.ndarray) -> np.ndarray:
  """The latent action to play for each true action: int64 (num_true,), all in
  [0, num_latent).

  `best_assignment`'s one-to-one match where it matches; a true action it leaves unmatched
  (more true than latent actions) gets its plurality latent action, and one that never
  occurred gets latent action 0. Every entry is a real latent action, so rolling out the
  mapped true actions never feeds a model an index outside its action vocabulary.
  """
  mapping = best_assignment(confusion)
  fallback = np.maximum(plurality_latent(confusion), 0)
  return np.where(mapping >= 0, mapping, fallback)


def confusion_image(confusion: np.ndarray, cell: int = 24,
                    true_names: list[str] | None = None) -> np.ndarray:
  """The confusion matrix as a uint8 (R, W, 3) picture for a PNG.

  One cell per entry, grey level = the entry's share of its true action's column (so each
  true action's spread over latent actions is visible whatever its frequency), with the
  count written in the cell. Rows are latent actions, columns true actions, labelled by
  index (or `true_names`, truncated to fit) on the top and left margins.
  """
  confusion = np.asarray(confusion, np.int64)
  rows, cols = confusion.shape
  column_share = confusion / np.maximum(confusion.sum(0, keepdims=True), 1)
  margin = cell
  image = Image.new("RGB", (margin + cols * cell, margin + rows * cell), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  for b in range(cols):
    label = str(b) if true_names is None else true_names[b][:3]
    draw.text((margin + b * cell + 2, 4), label, fill=(0, 0, 160))
  for a in range(rows):
    draw.text((4, margin + a * cell + 6), str(a), fill=(160, 0, 0))
    for b in range(cols):
      level = int(round(255 * (1.0 - column_share[a, b])))
      x, y = margin + b * cell, margin + a * cell
      draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(level, level, level),
                     outline=(200, 200, 200))
      text_colour = (255, 255, 255) if level < 128 else (0, 0, 0)
      draw.text((x + 2, y + 6), str(confusion[a, b])[:4], fill=text_colour)
  return np.asarray(image, np.uint8)
