"""A pod's workload: boto3 with its default credential chain, asking STS who it is."""
import sys

import boto3

sts = boto3.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1")
print(sts.get_caller_identity()["Arn"])
