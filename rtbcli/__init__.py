"""rtbcli: fine-tune diffusion samplers with RTB, Trust-PCL and KL-regularised REINFORCE."""

__version__ = "0.1.0"
