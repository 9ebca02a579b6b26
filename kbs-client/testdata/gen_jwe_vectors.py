#!/usr/bin/env python3
"""Regenerates the fixed JWE vectors with pyca/cryptography, an implementation independent of ours.

Writes ec_p256.pem/ec_p256.jwe.json (ECDH-ES+A256KW) and rsa2048.pem/rsa2048.jwe.json (RSA-OAEP-256),
each encrypting PLAINTEXT the way trustee's KBS does (flattened JSON, A256GCM, AAD = protected).
"""
import base64, json, os
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

PLAINTEXT = b"fixed vector plaintext \x00\x01\x02 from pyca/cryptography"

def b64u(b): return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def pem(k):
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption()).decode()

def content(header, cek, enc_key):
    protected = b64u(json.dumps(header, separators=(",", ":")).encode())
    iv = os.urandom(12)
    ct = AESGCM(cek).encrypt(iv, PLAINTEXT, protected.encode())
    return {"protected": protected, "encrypted_key": b64u(enc_key), "iv": b64u(iv),
            "ciphertext": b64u(ct[:-16]), "tag": b64u(ct[-16:])}

def u32(n): return n.to_bytes(4, "big")
def lp(b): return u32(len(b)) + b

# EC P-256, ECDH-ES+A256KW
tee = ec.generate_private_key(ec.SECP256R1())
eph = ec.generate_private_key(ec.SECP256R1())
z = eph.exchange(ec.ECDH(), tee.public_key())
kek = ConcatKDFHash(hashes.SHA256(), 32, lp(b"ECDH-ES+A256KW") + lp(b"") + lp(b"") + u32(256)).derive(z)
cek = os.urandom(32)
n = eph.public_key().public_numbers()
hdr = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM",
       "epk": {"crv": "P-256", "kty": "EC", "x": b64u(n.x.to_bytes(32, "big")), "y": b64u(n.y.to_bytes(32, "big"))}}
open("ec_p256.pem", "w").write(pem(tee))
json.dump(content(hdr, cek, aes_key_wrap(kek, cek)), open("ec_p256.jwe.json", "w"))

# RSA-OAEP-256
tee = rsa.generate_private_key(65537, 2048)
cek = os.urandom(32)
wrapped = tee.public_key().encrypt(cek, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
open("rsa2048.pem", "w").write(pem(tee))
json.dump(content({"alg": "RSA-OAEP-256", "enc": "A256GCM"}, cek, wrapped), open("rsa2048.jwe.json", "w"))
