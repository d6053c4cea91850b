"""Builds the descriptor model and prints its summary (training comes next)."""

from absl import app

from deep_retrieval.model import DescriptorConfig, build_descriptor_model


def main(argv):
    del argv
    model = build_descriptor_model(DescriptorConfig(backbone="tiny", weights=None))
    model.summary()
    print(f"descriptor size: {model.descriptor_size}")


if __name__ == "__main__":
    app.run(main)
