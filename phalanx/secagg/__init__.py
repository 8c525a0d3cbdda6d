"""Secure aggregation (SecAgg+, Bell et al. 2020, over Bonawitz et al. 2017), with no gRPC in it.

The coordinator learns the weighted sum of the sites' updates that reached it and nothing about
any one of them. One round, for the sites sampled (the participants, in a fixed order):

1. keys: each site makes two fresh X25519 key pairs (one to encrypt shares, one to agree mask
   seeds) and a fresh self-mask seed, and signs both public keys and a commitment to the seed
   with its certificate's key; the coordinator checks the signature against the certificate
   (issued by the federation's CA, role site, the site's name) and relays the keys.
2. shares: the participants form a random k-regular graph (`graph`), fixed by the run, round and
   participant list, so every party computes the same one. Each site checks its neighbours'
   signed keys the same way, Shamir-shares (`shamir`, threshold t) its self-mask seed and its mask
   private key among them, and encrypts each pair of shares to its neighbour (`keys`).
3. masked input: each site clips and quantises its update with its weight folded in
   (`quantise`), and adds its self mask and one pairwise mask per neighbour, + for a neighbour
   later in the order and - for one earlier (`masks`), all mod 2^32.
4. unmask: the coordinator names the sites whose input arrived (survivors) and those that shared
   but did not send one (dropped); each site reveals, per neighbour, the self-mask share of a
   survivor or the mask-key share of a dropped site, never both for one peer. With t of either
   kind, the coordinator removes every self mask and the pairwise masks of dropped sites.

`protocol` holds the two state machines, `SiteRound` and `ServerRound`.
"""
