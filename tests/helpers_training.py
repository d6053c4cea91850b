"""A training run of a few seconds for tests that run `training.train`
in a subprocess: the tiny preset at 64 px on a handful of facades."""

SMALL_TRAINING = [
    "--preset", "tiny", "--image_size", "64", "--batch_size", "2", "--mine_every", "50", "--whitening_images", "6",
    "--scales", "1.0", "--whitening_dim", "16", "--synthetic_train_landmarks", "4",
    "--synthetic_images_per_landmark", "3", "--synthetic_test_landmarks", "2",
    "--synthetic_test_images_per_landmark", "3", "--synthetic_distractors", "2",
    "--synthetic_image_width", "96", "--synthetic_image_height", "72", "--synthetic_seed", "5",
]
