"""Cryptographic building blocks: key handles, KDF, header format, AEAD.

Hazardous layer: these functions take keys and bytes and check nothing about tenants or
references. Application code goes through :class:`cuscred.CredentialService`.
"""
