"""vitrepro: reproduce 'An Image is Worth 16x16 Words' (Dosovitskiy et al., ICLR 2021)."""
__version__ = "0.1.0"
