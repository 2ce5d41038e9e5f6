// A pod's workload: the JavaScript SDK v3 with its default credential chain, asking STS who it is.
import { STSClient, GetCallerIdentityCommand } from "@aws-sdk/client-sts";

const client = new STSClient({ endpoint: process.argv[2], region: "us-east-1" });
const identity = await client.send(new GetCallerIdentityCommand({}));
console.log(identity.Arn);
