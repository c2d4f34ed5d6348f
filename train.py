"""Train a discrete autoencoder: `python train.py quantizer=fsq data=mnist`."""

from vqtrain.train import main

if __name__ == "__main__":
    main()
