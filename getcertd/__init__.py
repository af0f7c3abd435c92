"""getcertd: a certificate-enrollment appliance for IPsec remote access (draft-ietf-ipsra-getcert)."""

__version__ = "0.1.0"
